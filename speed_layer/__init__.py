"""Speed layer: Redis Streams consumers that fold each new event into fast state, and the lake writer."""

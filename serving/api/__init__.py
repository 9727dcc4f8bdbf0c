"""HTTP surface of the serving layer: dependencies and one router per resource."""

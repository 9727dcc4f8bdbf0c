"""One APIRouter per resource; `serving.main` mounts them all."""

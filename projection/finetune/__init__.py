"""Stage 2: fine-tune (part of) an encoder with the stage-1 projector and a task head."""

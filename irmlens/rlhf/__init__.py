"""RLHF stage: fine-tune the base model against a known reward model with a trl trainer."""

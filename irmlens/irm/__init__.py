"""The implicit reward model: ridge regression from feature-activation differences to the RM's utilities."""

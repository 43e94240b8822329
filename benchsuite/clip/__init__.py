"""open_clip loading and the prompted text and image encoders every method shares."""

"""End-to-end report sections of the main job (``python -m skattr``)."""

"""Inference backends behind one protocol (base.Backend); optional packages load lazily."""

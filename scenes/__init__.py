"""Generated scenes of coloured shapes with questions that have short, checkable answers.

numpy + Pillow only: calibration code (torch-free) draws its images from here too.
"""

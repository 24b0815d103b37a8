"""Training: observers (train-observer) and, later, students under RDED's recipe."""

"""Training building blocks shared by the stages: the loop's helpers (tracking, plots, …), no stage logic."""

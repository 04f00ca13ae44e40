"""Stage 1 from few pairs: stores that overlap partly, closed-form refinement over unpaired rows, the semi trainer."""

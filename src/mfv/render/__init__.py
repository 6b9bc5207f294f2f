"""The render stage: objectives, image parameterizations, TV denoising (`tv`), the recipes as
plug-ins (`recipes`), the batch driver (`batch`) and the plan of a run's pictures (`plan`)."""

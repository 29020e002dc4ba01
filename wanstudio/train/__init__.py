"""Training the tiny preset: procedural faces and speech, the dataset, the trainer, the
shipped weights. Nothing in the studio imports this package."""

"""What every batch stage is built on: the model pass shared by score and embed."""

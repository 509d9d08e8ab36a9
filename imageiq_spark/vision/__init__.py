"""Images as numpy: the transform, header probe, perceptual hashes, the preprocess Arrow UDF."""

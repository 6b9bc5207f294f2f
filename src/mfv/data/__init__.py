"""Images in: sources (folders, lists, the demo pool), decoding, preprocessing, spectra."""

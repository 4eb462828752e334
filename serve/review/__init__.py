"""`restage review`: human rating of generated images (paper 3.1 and A.3)."""

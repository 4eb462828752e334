"""`restage review`: a web app where raters judge generated images (paper 3.1 and A.3)."""

"""End-to-end studies (``kacq demo``) and the corpora they train on."""

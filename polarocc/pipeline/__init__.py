"""One module per DVC stage; the thin scripts in stages/ call these."""

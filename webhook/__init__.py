"""obd-autoconvert webhook service: registry notifications in, conversion jobs out."""

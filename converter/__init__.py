"""obd-autoconvert conversion engine: overlaybd formats, native ext4 builder, registry client, CLI."""

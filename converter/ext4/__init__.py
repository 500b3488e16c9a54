"""Native ext4 filesystem builder: mkfs and OCI layer apply."""

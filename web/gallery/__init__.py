"""The gallery pages: signed-link sign-in, the thumbnail grid, image pages, downloads, ZIPs,
delete, and "make again" / "variations" with live progress."""

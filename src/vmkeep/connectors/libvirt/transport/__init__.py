"""Reaching disk data: NBD readers (libvirt's export, a private qemu-nbd, over ssh), qemu-img
where the images are."""

//! QMP client: one connection to one QEMU monitor socket.

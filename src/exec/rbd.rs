//! Safe wrapper over librados/librbd: the only code that calls into Ceph.

//! RDMA transport (feature `rdma`): being written.

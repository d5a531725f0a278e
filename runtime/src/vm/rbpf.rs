//! rbpf adapter

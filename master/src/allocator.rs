//! Allocation modules (todo)

//! scheduler (todo)

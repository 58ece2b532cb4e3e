//! The executor API: write a framework's own executor (placeholder; filled in below).

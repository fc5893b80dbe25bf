//! Policy benchmark (in progress).
fn main() {}

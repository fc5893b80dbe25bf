//! `soma`: Soma's command-line tool (in progress).
fn main() {}

//! Soma operator.

//! Soma's validating admission webhook (in progress).

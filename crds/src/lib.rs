//! Soma custom resource types.

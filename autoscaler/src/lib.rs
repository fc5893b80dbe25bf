//! Conductance autoscaling with Erlang-C floors (being built).

//! Running the real Envoy in tests (owned by the Envoy-module work).

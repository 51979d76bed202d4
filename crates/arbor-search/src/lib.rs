//! arbor-search: the engine's one scheduler, the search strategies and the verifiers.
//! (Filled in by the [search] issue; the runtime's `Engine::step` is its only way to run a model.)

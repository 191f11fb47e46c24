//! Criterion benchmarks live in `benches/`; see the README for what each group measures.

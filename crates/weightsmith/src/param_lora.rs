//! LoRA on parameters (PEFT's `target_parameters`), merged into the tensors a checkpoint holds.
//!
//! PEFT's `ParamWrapper` adapts one in-memory parameter, typically a fused 3-D expert stack
//! `[experts, d1, d2]` (`mlp.experts.gate_up_proj`), that transformers builds from per-expert
//! tensors on disk (`block_sparse_moe.experts.{e}.w1.weight` and `w3`). Its delta, from
//! `ParamWrapper.get_delta_weight` (peft 0.21):
//! - `A` is `[r·E, in]` (expert `e`'s rows `e·r .. e·r + r`), `B` is `[out, r·E]` (expert `e`'s
//!   columns `e, E + e, 2E + e, …`: `B.reshape(out, r, E)`);
//! - parameters stored `[E, out, in]` (transformers' usual layout): `ΔP[e] = s · B_e · A_e`;
//!   stored `[E, in, out]` (`is_transposed` experts, gpt-oss): `ΔP[e] = s · (B_e · A_e)ᵀ`;
//! - a 2-D parameter (a router's `gate.weight`) is a plain linear LoRA, `ΔP = s · B · A`.
//!
//! Either way `ΔP[e] = s · L_e · R_e` with `L_e` `[d1, r]` and `R_e` `[r, d2]`, so the part of
//! the delta an on-disk tensor holds is an ordinary LoRA product (`B' = L_e[rows]`,
//! `A' = R_e[.., cols]`), merged by the same kernels on the same devices with the same bits.

use std::collections::HashMap;

use lora_kernels::to_f32_vec;
use st_io::arch::{self, ExpertBlock, Family};
use st_io::LoraAdapter;

use crate::merge::module_error;
use crate::Result;

/// A LoRA product for one on-disk tensor, in the shape the merge kernels take.
pub(crate) struct ParamTerm {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub scaling: f64,
    /// Rows of the product (`B'`'s rows) and its columns (`A'`'s).
    pub out: usize,
    pub inp: usize,
    /// The tensor holds the product transposed.
    pub transposed: bool,
    /// Which of the adapter's `parameter_loras` it came from.
    pub key: (String, usize),
}

/// The largest block-diagonal factor built for a whole 3-D parameter on disk (bytes).
const MAX_FACTOR_BYTES: usize = 1 << 30;

/// In-memory parameter → number of experts, for the fused parameters the base stores one expert
/// per tensor on disk (highest expert index + 1).
pub(crate) fn experts_on_disk<'a>(
    family: Option<&Family>,
    names: impl Iterator<Item = &'a str>,
) -> HashMap<String, u64> {
    let mut out: HashMap<String, u64> = HashMap::new();
    let Some(f) = family else { return out };
    for name in names {
        if let Ok(Some(arch::InMemory {
            param,
            block: Some(b),
        })) = arch::in_memory(f, name)
        {
            let n = out.entry(param).or_default();
            *n = (*n).max(b.expert + 1);
        }
    }
    out
}

/// The LoRA-on-parameters term of on-disk tensor `name` (shape `shape`), if the adapter has one.
pub(crate) fn parameter_term(
    adapter: &LoraAdapter,
    family: Option<&Family>,
    name: &str,
    shape: &[u64],
    experts_on_disk: &HashMap<String, u64>,
) -> Result<Option<ParamTerm>> {
    if adapter.parameter_loras.is_empty() {
        return Ok(None);
    }
    // A conversion weightsmith cannot express leaves the tensor as it is; a LoRA on its
    // parameter is then taken by no tensor, which `merge` refuses naming the module.
    let placed = family.and_then(|f| arch::in_memory(f, name).ok().flatten());
    let (param, block) = match placed {
        Some(p) => (p.param, p.block),
        None => (name.to_string(), None),
    };
    if !adapter.config.targets_parameter(&param) {
        return Ok(None);
    }
    let Some((module, _)) = param.rsplit_once('.') else {
        return Ok(None);
    };
    // The targeted parameters of the module, in PEFT's nesting order (the last outermost).
    let targeted: Vec<String> = match family {
        Some(f) => arch::module_parameters(f, module)
            .into_iter()
            .filter(|p| adapter.config.targets_parameter(p))
            .collect(),
        None => vec![param.clone()],
    };
    let Some(index) = targeted.iter().position(|p| *p == param) else {
        return Err(module_error(
            adapter,
            module,
            format!("targets \"{param}\", which weightsmith does not know as a parameter of this module"),
        ));
    };
    let depth = targeted.len() - 1 - index;
    if family.is_none()
        && adapter
            .parameter_loras
            .keys()
            .any(|(m, d)| m == module && *d > 0)
    {
        return Err(module_error(
            adapter,
            module,
            "wraps several parameters of this module, and which is which depends on the architecture, which weightsmith does not know (model_type); merge with PEFT instead".into(),
        ));
    }
    let Some(lora) = adapter.parameter_loras.get(&(module.to_string(), depth)) else {
        return Ok(None);
    };
    let rank = adapter.config.rank_for(&param);
    let scaling = adapter.config.scaling_for(&param);
    let rows_of_a = lora.a.shape[0];
    if rank == 0 || rows_of_a % rank != 0 {
        return Err(module_error(
            adapter,
            module,
            format!(
                "A of \"{param}\" has {rows_of_a} rows, not a multiple of its rank {rank} (rank · experts)"
            ),
        ));
    }
    let experts = rows_of_a / rank;
    // The in-memory parameter's [d1, d2] per expert.
    let (d1, d2, three_d) = match (&block, shape) {
        (Some(b), [r, c]) => {
            // The factors' expert count must be the base's: a wrong rank_pattern would
            // otherwise slice A and B at the wrong places and merge wrong values.
            let stored = experts_on_disk.get(&param).copied().unwrap_or(0);
            if experts != stored {
                return Err(module_error(
                    adapter,
                    module,
                    format!("A of \"{param}\" is for {experts} experts at rank {rank} ({rows_of_a} rows), but the base stores {stored} experts: check rank_pattern"),
                ));
            }
            let (h, w) = if b.transposed { (*c, *r) } else { (*r, *c) };
            (h * b.row_chunks, w * b.col_chunks, true)
        }
        (None, [e, r, c]) => {
            if *e != experts {
                return Err(module_error(
                    adapter,
                    module,
                    format!("A of \"{param}\" is for {experts} experts (rank {rank}) but \"{name}\" has {e}"),
                ));
            }
            (*r, *c, true)
        }
        (None, [r, c]) if experts == 1 => (*r, *c, false),
        _ => {
            return Err(module_error(
                adapter,
                module,
                format!(
                    "has a LoRA on \"{param}\" for {experts} experts, which does not fit \"{name}\" of shape {shape:?}"
                ),
            ))
        }
    };
    let is_transposed = three_d
        && family.is_some_and(|f| {
            f.transposed_experts
                .iter()
                .any(|t| arch::match_template(t, &param).is_some())
        });
    let (a_cols, b_rows) = if is_transposed { (d1, d2) } else { (d2, d1) };
    if lora.a.shape[1] != a_cols || lora.b.shape[0] != b_rows {
        return Err(module_error(
            adapter,
            module,
            format!(
                "has A {:?} and B {:?} for \"{param}\", which need A [{rows_of_a}, {a_cols}] and B [{b_rows}, {rows_of_a}]",
                lora.a.shape, lora.b.shape
            ),
        ));
    }
    let a = to_f32_vec(lora.a.dtype, adapter.tensor_bytes(&lora.a))?;
    let b = to_f32_vec(lora.b.dtype, adapter.tensor_bytes(&lora.b))?;
    let (r, e_count) = (rank as usize, experts as usize);
    let (d1, d2) = (d1 as usize, d2 as usize);
    let in_a = a_cols as usize;
    // ΔP[e] = s · L_e · R_e, L_e [d1, r], R_e [r, d2].
    let l = |e: usize, x: usize, k: usize| -> f32 {
        if is_transposed {
            a[(e * r + k) * in_a + x]
        } else {
            b[x * (r * e_count) + k * e_count + e]
        }
    };
    let rr = |e: usize, k: usize, y: usize| -> f32 {
        if is_transposed {
            b[y * (r * e_count) + k * e_count + e]
        } else {
            a[(e * r + k) * in_a + y]
        }
    };
    let key = (module.to_string(), depth);
    let term = match block {
        Some(ExpertBlock {
            expert,
            row_chunk,
            row_chunks,
            col_chunk,
            col_chunks,
            transposed,
        }) => {
            let e = expert as usize;
            if e >= e_count {
                return Err(module_error(
                    adapter,
                    module,
                    format!("\"{name}\" is expert {e}, but the LoRA on \"{param}\" covers {e_count} experts"),
                ));
            }
            let (h, w) = (d1 / row_chunks as usize, d2 / col_chunks as usize);
            let (x0, y0) = (row_chunk as usize * h, col_chunk as usize * w);
            let mut bp = Vec::with_capacity(h * r);
            for x in 0..h {
                for k in 0..r {
                    bp.push(l(e, x0 + x, k));
                }
            }
            let mut ap = Vec::with_capacity(r * w);
            for k in 0..r {
                for y in 0..w {
                    ap.push(rr(e, k, y0 + y));
                }
            }
            ParamTerm {
                a: ap,
                b: bp,
                rank: r,
                scaling,
                out: h,
                inp: w,
                transposed,
                key,
            }
        }
        None if three_d => {
            // The whole stack on disk: rows (e, x) of [E·d1, d2] take a block-diagonal factor
            // (its zeros add exact zeros, so the bits are those of a per-expert product).
            let big = e_count * r;
            if (e_count * d1).saturating_mul(big).saturating_mul(4) > MAX_FACTOR_BYTES {
                return Err(module_error(
                    adapter,
                    module,
                    format!("merging the LoRA on the whole 3-D \"{name}\" ({e_count} experts) would need a factor over 1 GiB; merge with PEFT instead"),
                ));
            }
            let mut bp = vec![0f32; e_count * d1 * big];
            for e in 0..e_count {
                for x in 0..d1 {
                    for k in 0..r {
                        bp[(e * d1 + x) * big + e * r + k] = l(e, x, k);
                    }
                }
            }
            let mut ap = Vec::with_capacity(big * d2);
            for e in 0..e_count {
                for k in 0..r {
                    for y in 0..d2 {
                        ap.push(rr(e, k, y));
                    }
                }
            }
            ParamTerm {
                a: ap,
                b: bp,
                rank: big,
                scaling,
                out: e_count * d1,
                inp: d2,
                transposed: false,
                key,
            }
        }
        None => ParamTerm {
            a,
            b,
            rank: r,
            scaling,
            out: d1,
            inp: d2,
            transposed: false,
            key,
        },
    };
    Ok(Some(term))
}

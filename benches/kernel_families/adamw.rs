//! The AdamW update as one fused program: per tensor, scalar and in vectors of four,
//! as altc compiles it (scalars apart from elements), and over all of the tiny
//! model's parameters in multi-tensor launches.

use crate::support::{
    configure, device, fits, sync, upload, values, vector_device, Device, Program, PAPER_EXPERTS,
    PAPER_HIDDEN, TEXT_WIDTH, TINY_EXPERTS, TINY_HIDDEN,
};
use altc_kernels::{BinaryKind, FusedProgram, Segment, UnaryKind, View};
use criterion::{Criterion, Throughput};
use cubecl::server::Handle;

/// The AdamW constants of the spec, shared by every AdamW program below.
const ADAM_BETAS: (f32, f32) = (0.9, 0.999);
const ADAM_EPS: f32 = 1e-8;

/// AdamW for one parameter tensor as one fused program. Inputs: m, v, param, grad;
/// outputs: new m, new v, new param. Step 10 of a run with the spec's betas and eps
/// and the paper's peak learning rate and final weight decay.
fn adamw_program() -> FusedProgram {
    let ((beta1, beta2), eps, lr, wd, step) = (ADAM_BETAS, ADAM_EPS, 1.5e-3f32, 0.2f32, 10);
    let mut p = Program::new(1, 4);
    let m = p.load(0);
    let v = p.load(1);
    let param = p.load(2);
    let g = p.load(3);
    let m_new = moment(&mut p, m, g, beta1);
    let g2 = p.unary(UnaryKind::Square, g);
    let v_new = moment(&mut p, v, g2, beta2);
    // Bias-corrected moments, then p' = p - lr (m^ / (sqrt(v^) + eps) + wd p).
    let c1 = p.constant(1.0 / (1.0 - beta1.powi(step)));
    let c2 = p.constant(1.0 / (1.0 - beta2.powi(step)));
    let m_hat = p.binary(BinaryKind::Mul, m_new, c1);
    let v_hat = p.binary(BinaryKind::Mul, v_new, c2);
    let root = p.unary(UnaryKind::Sqrt, v_hat);
    let eps = p.constant(eps);
    let denom = p.binary(BinaryKind::Add, root, eps);
    let ratio = p.binary(BinaryKind::Div, m_hat, denom);
    let wd = p.constant(wd);
    let decay = p.binary(BinaryKind::Mul, wd, param);
    let update = p.binary(BinaryKind::Add, ratio, decay);
    let lr = p.constant(lr);
    let scaled = p.binary(BinaryKind::Mul, lr, update);
    let param_new = p.binary(BinaryKind::Sub, param, scaled);
    p.finish(&[m_new, v_new, param_new])
}

pub(crate) fn adamw_update(c: &mut Criterion) {
    let Some(k) = device() else { return };
    let program = adamw_program();
    let mut group = c.benchmark_group("adamw_update");
    configure(&mut group);
    for (name, len, launches) in [
        // Tiny: the expert pool's w1, [4, 16, 16].
        (
            "tiny/experts.w1",
            TINY_EXPERTS * TINY_HIDDEN * TINY_HIDDEN,
            1,
        ),
        // Paper: the text input projection's weight, [4096, 2048], and the expert
        // pool's w1, [12, 2048, 2048], whose 201 MB exceed lavapipe's largest buffer:
        // it is updated in two launches of six experts.
        ("paper/text_projection.weight", TEXT_WIDTH * PAPER_HIDDEN, 1),
        (
            "paper/experts.w1",
            PAPER_EXPERTS * PAPER_HIDDEN * PAPER_HIDDEN,
            2,
        ),
    ] {
        let part = len / launches;
        if !fits(k, part, &format!("adamw_update/{name}")) {
            continue;
        }
        let parts: Vec<Vec<View>> = (0..launches as u64)
            .map(|l| {
                (0..4u64)
                    .map(|s| upload(k, &[part], 10 + 4 * l + s))
                    .collect()
            })
            .collect();
        // Four tensors read, three written.
        group.throughput(Throughput::Bytes((4 * 7 * len) as u64));
        // The fallback form, then four elements per access.
        for (suffix, kernels) in [("", k), ("/vector4", vector_device().unwrap_or(k))] {
            group.bench_function(format!("{name}/{len}{suffix}"), |b| {
                b.iter(|| {
                    let out: Vec<Vec<Handle>> = parts
                        .iter()
                        .map(|inputs| kernels.fused(&program, inputs, &[part], 0, 0))
                        .collect();
                    sync(kernels);
                    out
                })
            });
        }
    }
    group.finish();
}

/// The decayed, clipped AdamW update of one large parameter as altc planned it
/// before large tensors read their scalars from a kernel of their own: each element
/// recomputes the step count and bias corrections (two powers, a root and a
/// division) and the new step count is a scalar output. Inputs: param, grad, m, v,
/// then the scalars step, lr, weight decay and clipping coefficient; outputs: new
/// param, m, v and step count. The same 24 ops `altc compile --explain` listed.
fn adamw_scalars_per_element() -> FusedProgram {
    let (beta1, beta2) = ADAM_BETAS;
    let mut p = Program::new(1, 8);
    let [param, g, m, v, step, lr, wd, coef] = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| p.load(i));
    let one = p.constant(1.0);
    let lr_wd = p.binary(BinaryKind::Mul, lr, wd);
    let keep = p.binary(BinaryKind::Sub, one, lr_wd);
    let decayed = p.binary(BinaryKind::Mul, param, keep);
    let clipped = p.binary(BinaryKind::Mul, g, coef);
    let m_new = moment(&mut p, m, clipped, beta1);
    let g2 = p.unary(UnaryKind::Square, clipped);
    let v_new = moment(&mut p, v, g2, beta2);
    let BiasCorrection {
        step: t,
        step_size,
        root_bc2,
    } = bias_correction(&mut p, step, lr, one);
    let root_v = p.unary(UnaryKind::Sqrt, v_new);
    let scaled_root = p.binary(BinaryKind::Div, root_v, root_bc2);
    let eps = p.constant(ADAM_EPS);
    let denom = p.binary(BinaryKind::Add, scaled_root, eps);
    let ratio = p.binary(BinaryKind::Div, m_new, denom);
    let delta = p.binary(BinaryKind::Mul, ratio, step_size);
    let param_new = p.binary(BinaryKind::Sub, decayed, delta);
    let mut program = p.finish(&[param_new, m_new, v_new, t]);
    program.scalar_outputs = vec![3];
    program
}

/// Registers of AdamW's step count and bias corrections.
struct BiasCorrection {
    /// The new step count `t = step + 1`.
    step: usize,
    /// `lr / (1 - beta1^t)`.
    step_size: usize,
    /// `sqrt(1 - beta2^t)`.
    root_bc2: usize,
}

/// AdamW's step count and bias corrections from registers `step`, `lr` and `one`.
fn bias_correction(p: &mut Program, step: usize, lr: usize, one: usize) -> BiasCorrection {
    let t = p.binary(BinaryKind::Add, step, one);
    let mut correction = |beta: f32| {
        let b = p.constant(beta);
        let power = p.binary(BinaryKind::Pow, b, t);
        p.binary(BinaryKind::Sub, one, power)
    };
    let bc1 = correction(ADAM_BETAS.0);
    let bc2 = correction(ADAM_BETAS.1);
    let step_size = p.binary(BinaryKind::Div, lr, bc1);
    let root_bc2 = p.unary(UnaryKind::Sqrt, bc2);
    BiasCorrection {
        step: t,
        step_size,
        root_bc2,
    }
}

/// `state * beta + value * (1 - beta)`: a moment's update.
fn moment(p: &mut Program, state: usize, value: usize, beta: f32) -> usize {
    let b = p.constant(beta);
    let rest = p.constant(1.0 - beta);
    let kept = p.binary(BinaryKind::Mul, state, b);
    let new = p.binary(BinaryKind::Mul, value, rest);
    p.binary(BinaryKind::Add, kept, new)
}

/// The scalars of the update as planned now, computed once: inputs step, lr, weight
/// decay, clipping coefficient; outputs the new step count, `keep = 1 - lr wd`, the
/// clipped first-moment rate `coef (1 - beta1)`, the collected step factor
/// `sqrt(bc2) lr / bc1` and the denominator's `eps sqrt(bc2)`.
fn adamw_scalars() -> FusedProgram {
    let mut p = Program::new(0, 4);
    let [step, lr, wd, coef] = [0, 1, 2, 3].map(|i| p.load(i));
    let one = p.constant(1.0);
    let lr_wd = p.binary(BinaryKind::Mul, lr, wd);
    let keep = p.binary(BinaryKind::Sub, one, lr_wd);
    let rest1 = p.constant(1.0 - ADAM_BETAS.0);
    let clipped_rate = p.binary(BinaryKind::Mul, coef, rest1);
    let BiasCorrection {
        step: t,
        step_size,
        root_bc2,
    } = bias_correction(&mut p, step, lr, one);
    let step_factor = p.binary(BinaryKind::Mul, root_bc2, step_size);
    let eps = p.constant(ADAM_EPS);
    let scaled_eps = p.binary(BinaryKind::Mul, eps, root_bc2);
    p.finish(&[t, keep, clipped_rate, step_factor, scaled_eps])
}

/// The elementwise part of the update as planned now, its scalar factors collected
/// by the e-graph: 14 ops, no scalar outputs, so it may run in vectors. Inputs:
/// param, grad, m, v, then `keep`, the clipping coefficient, `coef (1 - beta1)`, the
/// step factor and the scaled eps; outputs new param, m and v.
fn adamw_elements() -> FusedProgram {
    let (beta1, beta2) = ADAM_BETAS;
    let mut p = Program::new(1, 9);
    let [param, g, m, v, keep, coef, clipped_rate, step_factor, scaled_eps] =
        [0, 1, 2, 3, 4, 5, 6, 7, 8].map(|i| p.load(i));
    let decayed = p.binary(BinaryKind::Mul, param, keep);
    let b1 = p.constant(beta1);
    let m_kept = p.binary(BinaryKind::Mul, m, b1);
    let m_added = p.binary(BinaryKind::Mul, g, clipped_rate);
    let m_new = p.binary(BinaryKind::Add, m_kept, m_added);
    let clipped = p.binary(BinaryKind::Mul, g, coef);
    let g2 = p.unary(UnaryKind::Square, clipped);
    let v_new = moment(&mut p, v, g2, beta2);
    let root_v = p.unary(UnaryKind::Sqrt, v_new);
    let denom = p.binary(BinaryKind::Add, root_v, scaled_eps);
    let numerator = p.binary(BinaryKind::Mul, m_new, step_factor);
    let delta = p.binary(BinaryKind::Div, numerator, denom);
    let param_new = p.binary(BinaryKind::Sub, decayed, delta);
    p.finish(&[param_new, m_new, v_new])
}

/// The update of the paper's text projection weight (`[4096, 2048]`) in the forms
/// the planner chooses between: every element recomputing the scalars, against the
/// scalars computed by one small kernel and the collected elementwise program (its
/// fallback form, then four elements per access).
pub(crate) fn adamw_as_compiled(c: &mut Criterion) {
    let Some(k) = device() else { return };
    let len = TEXT_WIDTH * PAPER_HIDDEN;
    let name = format!("adamw_update/paper/text_projection.weight/{len}/as_compiled");
    if !fits(k, len, &name) {
        return;
    }
    let mut group = c.benchmark_group("adamw_update");
    configure(&mut group);
    // param, grad, m and v; the second moment is never negative.
    let tensors: Vec<View> = (0..4u64)
        .map(|s| {
            let mut data = values(len, 60 + s);
            if s == 3 {
                data.iter_mut().for_each(|x| *x = x.abs());
            }
            View::contiguous(k.upload(&data), &[len])
        })
        .collect();
    // step 9, lr, weight decay, a clipping coefficient below 1.
    let scalar_values = [9.0f32, 1.5e-3, 0.2, 0.7];
    let scalars: Vec<View> = scalar_values
        .iter()
        .map(|v| View::contiguous(k.upload(&[*v]), &[]))
        .collect();
    let spread = |v: &View| View {
        strides: vec![0],
        ..v.clone()
    };
    group.throughput(Throughput::Bytes((4 * 7 * len) as u64));
    let per_element = adamw_scalars_per_element();
    let per_element_inputs: Vec<View> = tensors
        .iter()
        .cloned()
        .chain(scalars.iter().map(spread))
        .collect();
    group.bench_function(
        "paper/text_projection.weight/as_compiled/scalars_per_element",
        |b| {
            b.iter(|| {
                let out = k.fused(&per_element, &per_element_inputs, &[len], 0, 0);
                sync(k);
                out
            })
        },
    );
    let (scalar_program, elements) = (adamw_scalars(), adamw_elements());
    let scalars_apart = |kernels: &Device| {
        let computed = kernels.fused(&scalar_program, &scalars, &[], 0, 0);
        // keep, coef, coef (1 - beta1), step factor, scaled eps.
        let factors = [
            &computed[1],
            &scalars[3].handle,
            &computed[2],
            &computed[3],
            &computed[4],
        ]
        .map(|h| View {
            handle: h.clone(),
            len: 1,
            offset: 0,
            strides: vec![0],
        });
        let inputs: Vec<View> = tensors.iter().cloned().chain(factors).collect();
        kernels.fused(&elements, &inputs, &[len], 0, 0)
    };
    // Both forms compute the same update (to f32 rounding), or the comparison is void.
    let before = k.fused(&per_element, &per_element_inputs, &[len], 0, 0);
    let after = scalars_apart(k);
    for (output, (a, b)) in before.iter().zip(&after).enumerate() {
        let (a, b) = (k.read(a.clone(), len), k.read(b.clone(), len));
        let agree = a
            .iter()
            .zip(&b)
            .all(|(x, y)| (x - y).abs() <= 1e-3 * y.abs().max(1e-3));
        assert!(agree, "output {output}: the two forms of the update differ");
    }
    for (suffix, kernels) in [("", k), ("/vector4", vector_device().unwrap_or(k))] {
        group.bench_function(
            format!("paper/text_projection.weight/as_compiled/scalars_apart{suffix}"),
            |b| {
                b.iter(|| {
                    let out = scalars_apart(kernels);
                    sync(kernels);
                    out
                })
            },
        );
    }
    group.finish();
}

/// Sizes of the tiny model's trainable tensors that one training step updates (a
/// representative mix: weights, biases, norms, embeddings, the expert pool).
const TINY_PARAMETER_SIZES: [usize; 12] = [384, 16, 256, 16, 1024, 64, 1024, 64, 16, 16, 256, 24];

/// AdamW over every tiny parameter: one fused launch per tensor, against
/// multi-tensor launches of as many tensors as the device's bindings allow.
pub(crate) fn adamw_all_parameters(c: &mut Criterion) {
    let Some(k) = device() else { return };
    let program = adamw_program();
    let mut group = c.benchmark_group("adamw_update");
    configure(&mut group);
    let tensors: Vec<(usize, Vec<View>)> = TINY_PARAMETER_SIZES
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let inputs = (0..4u64)
                .map(|s| upload(k, &[len], 40 + 4 * i as u64 + s))
                .collect();
            (len, inputs)
        })
        .collect();
    let total: usize = TINY_PARAMETER_SIZES.iter().sum();
    group.throughput(Throughput::Bytes((4 * 7 * total) as u64));
    let label = format!("tiny/all_parameters/{}_tensors", tensors.len());
    group.bench_function(format!("{label}/per_tensor"), |b| {
        b.iter(|| {
            let out: Vec<Vec<Handle>> = tensors
                .iter()
                .map(|(len, inputs)| k.fused(&program, inputs, &[*len], 0, 0))
                .collect();
            sync(k);
            out
        })
    });
    // Each tensor binds 4 inputs and 3 outputs; one binding is the metadata and one is
    // left for cubecl's own.
    let bindings = k.client().properties().hardware.max_bindings as usize;
    let per_launch = (bindings.saturating_sub(2) / 7).max(1);
    let segments: Vec<Segment> = tensors
        .iter()
        .map(|(len, inputs)| Segment {
            len: *len,
            inputs: inputs.clone(),
        })
        .collect();
    group.bench_function(format!("{label}/multi_tensor"), |b| {
        b.iter(|| {
            let out: Vec<Vec<Vec<Handle>>> = segments
                .chunks(per_launch)
                .map(|chunk| k.multi_fused(&program, &[], chunk))
                .collect();
            sync(k);
            out
        })
    });
    group.finish();
}

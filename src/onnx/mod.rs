//! ONNX export of a model: `effdet export`.
//!
//! The graph is not described a second time: the network code (`crate::model`) runs once on
//! [`OnnxRecorder`], a [`Backend`] whose tensors are graph values and whose ops append ONNX
//! nodes. The weights it "uploads" at load time (batch norms already folded, exactly as the CPU
//! engine holds them) become initializers; the forward pass becomes the node list. So the file
//! computes what our CPU engine computes, op for op, and stays in step with the model code.
//!
//! The graph: input `images`, float32 `[N, 3, S, S]`, normalised exactly as
//! [`crate::Detector::preprocess`] produces it (letterboxed RGB, ImageNet mean and std);
//! outputs `class_3` .. `class_7` (`[N, A*C, H, W]` logits) and `box_3` .. `box_7`
//! (`[N, A*4, H, W]` codes ty, tx, th, tw), per pyramid level, the raw head outputs
//! ([`crate::model::LevelOutputs`]) that anchors, decoding and NMS turn into detections.
//! Opset 17, IR version 8; TF-SAME padding is written as explicit (possibly asymmetric)
//! `pads`, swish as `x * Sigmoid(x)`, the BiFPN's fusion as `Mul` by constants and `Sum`, the
//! nearest upsampling as `Resize` (`asymmetric`, `floor`: PyTorch's `nearest`) to sizes built
//! from the input's own batch, so a dynamic batch works.
//!
//! With [`PostprocessGraph::Onnx`] the graph goes on to detections (`postprocess_graph`): the
//! steps of [`crate::postprocess`] in standard ops, ending in the four outputs of TensorRT's
//! `EfficientNMS_TRT` (`num_detections`, `detection_boxes`, `detection_scores`,
//! `detection_classes`).
//!
//! The protobuf messages are `prost` structs over ONNX's field numbers ([`proto`]); `prost` is
//! a small, well-kept pure-Rust protobuf runtime, and the hand-written subset needs no `protoc`
//! at build time.

pub mod proto;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use prost::Message;

use crate::compute::{Activation, Backend, ConvSpec, Padding, Tensor};
use crate::detector::{META_IMAGE_SIZE, META_LABELS, config_for_weights};
use crate::error::{Error, Result};
use crate::model::{EfficientDet, EfficientDetConfig, WeightStore};
use proto::*;

/// The ONNX operator set the export targets.
pub const OPSET: i64 = 17;
/// The ONNX IR version of the files written.
pub const IR_VERSION: i64 = 8;

/// The batch dimension of an exported model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchDim {
    /// A fixed batch size.
    Fixed(usize),
    /// A symbolic batch `N`; `max` (at least 1) is recorded as metadata `effdet.max_batch`,
    /// the upper end of an engine builder's optimisation profile.
    Dynamic { max: usize },
}

/// What follows the network in the exported graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PostprocessGraph {
    /// Nothing: the ten raw head outputs.
    #[default]
    None,
    /// Top-k, box decoding against the anchors, clipping and per-class hard NMS in standard
    /// ONNX ops (`TopK`, `NonMaxSuppression`, gathers): the four outputs of TensorRT's
    /// `EfficientNMS_TRT` (`num_detections`, `detection_boxes`, `detection_scores`,
    /// `detection_classes`).
    Onnx,
}

impl std::str::FromStr for PostprocessGraph {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(PostprocessGraph::None),
            "onnx" => Ok(PostprocessGraph::Onnx),
            other => Err(Error::InvalidArgument(format!(
                "--postprocess {other}: expected none or onnx"
            ))),
        }
    }
}

/// What to export.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Square network input size (a multiple of 128); `None`: the size the weights were
    /// trained at (metadata `effdet.image_size`), else 512.
    pub input_size: Option<usize>,
    pub batch: BatchDim,
    pub postprocess: PostprocessGraph,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            input_size: None,
            batch: BatchDim::Dynamic { max: 32 },
            postprocess: PostprocessGraph::None,
        }
    }
}

/// What [`export`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportReport {
    pub image_size: usize,
    pub num_classes: usize,
    pub nodes: usize,
    pub initializers: usize,
    pub bytes: usize,
}

/// A graph value: its name and shape (with the batch size the graph was recorded at).
#[derive(Clone, Debug)]
pub struct Value {
    name: String,
    shape: Vec<usize>,
}

#[derive(Default)]
struct Graph {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    /// Initializer name -> index, for ops that need an initializer's data in another shape.
    by_name: HashMap<String, usize>,
    next: usize,
}

/// A [`Backend`] that records the ops run on it as an ONNX graph instead of computing them.
#[derive(Default)]
pub struct OnnxRecorder {
    g: Mutex<Graph>,
}

fn attr_ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        ints: v.iter().map(|&x| x as i64).collect(),
        r#type: attribute_type::INTS,
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i: v,
        r#type: attribute_type::INT,
        ..Default::default()
    }
}

fn attr_str(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        s: v.as_bytes().to_vec(),
        r#type: attribute_type::STRING,
        ..Default::default()
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn dims4(op: &'static str, v: &Value) -> Result<[usize; 4]> {
    match v.shape[..] {
        [n, c, h, w] => Ok([n, c, h, w]),
        _ => Err(Error::Shape {
            op,
            detail: format!("expected a 4-D value, got {:?}", v.shape),
        }),
    }
}

impl OnnxRecorder {
    fn graph(&self) -> std::sync::MutexGuard<'_, Graph> {
        // A poisoned lock only means a panic elsewhere mid-op; the lists are still valid.
        self.g.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fresh(&self, prefix: &str) -> String {
        let mut g = self.graph();
        g.next += 1;
        format!("{prefix}{}", g.next)
    }

    /// Appends `op(inputs) -> one new value of `shape``.
    fn node(
        &self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        shape: Vec<usize>,
    ) -> Value {
        let mut outs = self.node_n(op, inputs, attrs, vec![shape]);
        outs.remove(0)
    }

    /// Appends `op(inputs)` with `outputs` new values (shapes for bookkeeping only).
    fn node_n(
        &self,
        op: &str,
        inputs: &[&str],
        attrs: Vec<AttributeProto>,
        shapes: Vec<Vec<usize>>,
    ) -> Vec<Value> {
        let outs: Vec<Value> = shapes
            .into_iter()
            .map(|shape| Value {
                name: self.fresh("t"),
                shape,
            })
            .collect();
        self.graph().nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outs.iter().map(|v| v.name.clone()).collect(),
            name: format!("{op}_{}", outs[0].name),
            op_type: op.into(),
            attribute: attrs,
            ..Default::default()
        });
        outs
    }

    fn const_i64(&self, v: &[i64]) -> Value {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.initializer("c", &[v.len()], data_type::INT64, raw)
    }

    fn const_f32(&self, dims: &[usize], v: &[f32]) -> Value {
        self.initializer("c", dims, data_type::FLOAT, f32_bytes(v))
    }

    fn op(&self, op: &str, inputs: &[&Value], attrs: Vec<AttributeProto>) -> Value {
        let names: Vec<&str> = inputs.iter().map(|v| v.name.as_str()).collect();
        self.node(op, &names, attrs, inputs[0].shape.clone())
    }

    fn initializer(&self, prefix: &str, dims: &[usize], data_type: i32, raw: Vec<u8>) -> Value {
        let name = self.fresh(prefix);
        let mut g = self.graph();
        let index = g.initializers.len();
        g.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            name: name.clone(),
            raw_data: raw,
        });
        g.by_name.insert(name.clone(), index);
        Value {
            name,
            shape: dims.to_vec(),
        }
    }

    fn scalar(&self, v: f32) -> Value {
        self.initializer("c", &[], data_type::FLOAT, v.to_le_bytes().to_vec())
    }

    /// An initializer's data as `[1, C, 1, 1]`, to broadcast over NCHW.
    fn per_channel(&self, v: &Value) -> Result<Value> {
        let raw = {
            let g = self.graph();
            let i = g.by_name.get(&v.name).ok_or_else(|| Error::Shape {
                op: "onnx per-channel constant",
                detail: format!("{} is not a constant", v.name),
            })?;
            g.initializers[*i].raw_data.clone()
        };
        let c = v.shape.iter().product();
        Ok(self.initializer("w", &[1, c, 1, 1], data_type::FLOAT, raw))
    }

    fn activate(&self, x: Value, act: Activation) -> Value {
        match act {
            Activation::None => x,
            Activation::Relu => self.node("Relu", &[&x.name], vec![], x.shape.clone()),
            Activation::Sigmoid => self.node("Sigmoid", &[&x.name], vec![], x.shape.clone()),
            Activation::Swish => {
                let s = self.node("Sigmoid", &[&x.name], vec![], x.shape.clone());
                self.node("Mul", &[&x.name, &s.name], vec![], x.shape.clone())
            }
        }
    }

    /// The graph input `images`, `[batch, 3, size, size]`.
    fn input(&self, batch: usize, size: usize) -> Value {
        Value {
            name: "images".into(),
            shape: vec![batch, 3, size, size],
        }
    }

    /// `Identity(v) -> name`, so an output carries its documented name.
    fn rename(&self, v: &Value, name: &str) {
        self.graph().nodes.push(NodeProto {
            input: vec![v.name.clone()],
            output: vec![name.into()],
            name: format!("Identity_{name}"),
            op_type: "Identity".into(),
            ..Default::default()
        });
    }
}

impl Backend for OnnxRecorder {
    type Tensor = Value;

    fn name(&self) -> &'static str {
        "onnx"
    }

    fn upload(&self, t: &Tensor) -> Result<Value> {
        Ok(self.initializer("w", t.shape(), data_type::FLOAT, f32_bytes(t.data())))
    }

    fn download(&self, t: &Value) -> Result<Tensor> {
        Err(Error::InvalidArgument(format!(
            "the ONNX recorder holds no data ({} is a graph value)",
            t.name
        )))
    }

    fn shape(&self, t: &Value) -> Vec<usize> {
        t.shape.clone()
    }

    fn conv2d(
        &self,
        x: &Value,
        weight: &Value,
        bias: Option<&Value>,
        spec: ConvSpec,
        residual: Option<&Value>,
    ) -> Result<Value> {
        let [n, _, h, w] = dims4("onnx conv2d", x)?;
        let [cout, _, kh, kw] = dims4("onnx conv2d weight", weight)?;
        let (oh, pt, pb) = spec.padding.resolve(h, kh, spec.stride, true);
        let (ow, pl, pr) = spec.padding.resolve(w, kw, spec.stride, false);
        let mut inputs = vec![x.name.as_str(), weight.name.as_str()];
        if let Some(b) = bias {
            inputs.push(&b.name);
        }
        let y = self.node(
            "Conv",
            &inputs,
            vec![
                attr_ints("kernel_shape", &[kh, kw]),
                attr_ints("strides", &[spec.stride, spec.stride]),
                attr_ints("pads", &[pt, pl, pb, pr]),
                attr_ints("dilations", &[1, 1]),
                attr_int("group", spec.groups as i64),
            ],
            vec![n, cout, oh, ow],
        );
        let y = self.activate(y, spec.act);
        Ok(match residual {
            Some(r) => self.node("Add", &[&y.name, &r.name], vec![], y.shape.clone()),
            None => y,
        })
    }

    fn channel_affine(
        &self,
        x: &Value,
        scale: &Value,
        shift: &Value,
        act: Activation,
    ) -> Result<Value> {
        let (s, b) = (self.per_channel(scale)?, self.per_channel(shift)?);
        let y = self.node("Mul", &[&x.name, &s.name], vec![], x.shape.clone());
        let y = self.node("Add", &[&y.name, &b.name], vec![], x.shape.clone());
        Ok(self.activate(y, act))
    }

    fn activation(&self, x: &Value, act: Activation) -> Result<Value> {
        Ok(match act {
            Activation::None => self.node("Identity", &[&x.name], vec![], x.shape.clone()),
            _ => self.activate(x.clone(), act),
        })
    }

    fn global_avg_pool(&self, x: &Value) -> Result<Value> {
        let [n, c, _, _] = dims4("onnx global_avg_pool", x)?;
        Ok(self.node("GlobalAveragePool", &[&x.name], vec![], vec![n, c, 1, 1]))
    }

    fn scale_channels(&self, x: &Value, s: &Value) -> Result<Value> {
        Ok(self.node("Mul", &[&x.name, &s.name], vec![], x.shape.clone()))
    }

    fn add(&self, a: &Value, b: &Value) -> Result<Value> {
        Ok(self.node("Add", &[&a.name, &b.name], vec![], a.shape.clone()))
    }

    fn max_pool_same(&self, x: &Value, kernel: usize, stride: usize) -> Result<Value> {
        let [n, c, h, w] = dims4("onnx max_pool_same", x)?;
        // ONNX MaxPool ignores padded positions, as -inf padding does.
        let (oh, pt, pb) = Padding::Same.resolve(h, kernel, stride, true);
        let (ow, pl, pr) = Padding::Same.resolve(w, kernel, stride, false);
        Ok(self.node(
            "MaxPool",
            &[&x.name],
            vec![
                attr_ints("kernel_shape", &[kernel, kernel]),
                attr_ints("strides", &[stride, stride]),
                attr_ints("pads", &[pt, pl, pb, pr]),
            ],
            vec![n, c, oh, ow],
        ))
    }

    fn upsample_nearest(&self, x: &Value, height: usize, width: usize) -> Result<Value> {
        let [n, c, _, _] = dims4("onnx upsample_nearest", x)?;
        // sizes = concat(shape(x)[0:2], [height, width]): the batch stays symbolic.
        let shape = self.node("Shape", &[&x.name], vec![], vec![4]);
        let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let start = self.initializer("c", &[1], data_type::INT64, i64s(&[0]));
        let end = self.initializer("c", &[1], data_type::INT64, i64s(&[2]));
        let nc = self.node(
            "Slice",
            &[&shape.name, &start.name, &end.name],
            vec![],
            vec![2],
        );
        let hw = self.initializer(
            "c",
            &[2],
            data_type::INT64,
            i64s(&[height as i64, width as i64]),
        );
        let sizes = self.node(
            "Concat",
            &[&nc.name, &hw.name],
            vec![attr_int("axis", 0)],
            vec![4],
        );
        Ok(self.node(
            "Resize",
            &[&x.name, "", "", &sizes.name],
            vec![
                attr_str("mode", "nearest"),
                attr_str("coordinate_transformation_mode", "asymmetric"),
                attr_str("nearest_mode", "floor"),
            ],
            vec![n, c, height, width],
        ))
    }

    fn weighted_sum(&self, xs: &[&Value], weights: &[f32], act: Activation) -> Result<Value> {
        if xs.is_empty() || xs.len() != weights.len() {
            return Err(Error::InvalidArgument(format!(
                "weighted_sum: {} inputs and {} weights",
                xs.len(),
                weights.len()
            )));
        }
        let terms: Vec<Value> = xs
            .iter()
            .zip(weights)
            .map(|(x, &w)| {
                let c = self.scalar(w);
                self.node("Mul", &[&x.name, &c.name], vec![], x.shape.clone())
            })
            .collect();
        let names: Vec<&str> = terms.iter().map(|t| t.name.as_str()).collect();
        let y = self.node("Sum", &names, vec![], xs[0].shape.clone());
        Ok(self.activate(y, act))
    }
}

/// Appends the post-processing to the graph: the same steps as [`crate::postprocess`] (top-k
/// over all levels' logits with lower flat index first on ties, box decoding against the
/// anchors, clipping to the network input, sigmoid, per-class hard NMS, the best
/// `max_detections` in score order), returning `num_detections` (int32 `[N, 1]`),
/// `detection_boxes` (`[N, K, 4]`, x1 y1 x2 y2 in network-input pixels), `detection_scores`
/// (`[N, K]`) and `detection_classes` (int32 `[N, K]`, 0-based); entries past
/// `num_detections` are 0. The clip is to the whole input (what the CPU does for a square
/// frame; for a letterboxed non-square frame the CPU clips to the image part).
fn postprocess_graph(
    rec: &OnnxRecorder,
    outs: &[crate::model::LevelOutputs<Value>],
    config: &EfficientDetConfig,
    post: &crate::postprocess::PostprocessConfig,
) -> Result<[Value; 4]> {
    use crate::postprocess::{AnchorConfig, Anchors};
    let anchors = Anchors::new(&AnchorConfig {
        min_level: config.min_level,
        max_level: config.max_level,
        num_scales: config.num_scales,
        aspect_ratios: config.aspect_ratios.clone(),
        anchor_scale: config.anchor_scale,
        image_size: config.image_size,
    })?;
    let c = config.num_classes;
    let a_total = anchors.len();
    let n_logits = a_total * c;
    let k = post.max_detection_points.min(n_logits).max(1);
    let kd = post.max_detections.min(c * k).max(1);
    let size = config.image_size.0 as f32;
    // Every level to [N, H*W*A, C] / [N, H*W*A, 4] (channel = anchor * C + class), concatenated.
    let flat = |v: &Value, per: usize| {
        let t = rec.op("Transpose", &[v], vec![attr_ints("perm", &[0, 2, 3, 1])]);
        let shape = rec.const_i64(&[0, -1, per as i64]);
        rec.op("Reshape", &[&t, &shape], vec![])
    };
    let cls: Vec<Value> = outs.iter().map(|o| flat(&o.class, c)).collect();
    let cod: Vec<Value> = outs.iter().map(|o| flat(&o.boxes, 4)).collect();
    let concat = |vs: &[Value]| {
        let r: Vec<&Value> = vs.iter().collect();
        rec.op("Concat", &r, vec![attr_int("axis", 1)])
    };
    let (logits, codes) = (concat(&cls), concat(&cod));
    // The `count` largest of `v` flattened per image (sorted; equal values: lower index first,
    // as ours), with each one's flat index split as (index / row, index % row).
    let top = |v: &Value, count: usize, row: usize| {
        let flat = rec.op("Reshape", &[v, &rec.const_i64(&[0, -1])], vec![]);
        let kv = rec.const_i64(&[count as i64]);
        let t = rec.node_n(
            "TopK",
            &[&flat.name, &kv.name],
            vec![
                attr_int("axis", 1),
                attr_int("largest", 1),
                attr_int("sorted", 1),
            ],
            vec![vec![0, count], vec![0, count]],
        );
        // node_n returns one value per shape given: values, then indices.
        let (values, index) = (t[0].clone(), t[1].clone());
        let r = rec.const_i64(&[row as i64]);
        let major = rec.op("Div", &[&index, &r], vec![]);
        let minor = rec.op("Mod", &[&index, &r], vec![]);
        (values, major, minor)
    };
    // Top-k of all logits: anchor = flat / C, class = flat % C.
    let (values, anchor, class) = top(&logits, k, c);
    let values = &values;
    // The candidates' codes and anchors, [N, k, 4].
    let by4 = |idx: &Value| {
        let u = rec.op("Unsqueeze", &[idx, &rec.const_i64(&[2])], vec![]);
        rec.op("Expand", &[&u, &rec.const_i64(&[1, 1, 4])], vec![])
    };
    let code = rec.op(
        "GatherElements",
        &[&codes, &by4(&anchor)],
        vec![attr_int("axis", 1)],
    );
    let table: Vec<f32> = anchors.boxes().iter().flatten().copied().collect();
    let table = rec.const_f32(&[a_total, 4], &table);
    let anc = rec.op("Gather", &[&table, &anchor], vec![attr_int("axis", 0)]);
    // decode_box, op for op: anchors are y1 x1 y2 x2, codes ty tx th tw.
    let split = |v: &Value| {
        let shapes = vec![vec![0, k, 1]; 4];
        rec.node_n("Split", &[&v.name], vec![attr_int("axis", 2)], shapes)
    };
    let (a4, c4) = (split(&anc), split(&code));
    let two = rec.const_f32(&[], &[2.0]);
    let bin = |op: &str, x: &Value, y: &Value| rec.op(op, &[x, y], vec![]);
    let yca = bin("Div", &bin("Add", &a4[0], &a4[2]), &two);
    let xca = bin("Div", &bin("Add", &a4[1], &a4[3]), &two);
    let ha = bin("Sub", &a4[2], &a4[0]);
    let wa = bin("Sub", &a4[3], &a4[1]);
    let w = bin("Mul", &rec.op("Exp", &[&c4[3]], vec![]), &wa);
    let h = bin("Mul", &rec.op("Exp", &[&c4[2]], vec![]), &ha);
    let yc = bin("Add", &bin("Mul", &c4[0], &ha), &yca);
    let xc = bin("Add", &bin("Mul", &c4[1], &wa), &xca);
    let (w2, h2) = (bin("Div", &w, &two), bin("Div", &h, &two));
    let (lo, hi) = (rec.const_f32(&[], &[0.0]), rec.const_f32(&[], &[size]));
    let clip = |v: Value| rec.op("Clip", &[&v, &lo, &hi], vec![]);
    let x1 = clip(bin("Sub", &xc, &w2));
    let y1 = clip(bin("Sub", &yc, &h2));
    let x2 = clip(bin("Add", &xc, &w2));
    let y2 = clip(bin("Add", &yc, &h2));
    let boxes = rec.op("Concat", &[&x1, &y1, &x2, &y2], vec![attr_int("axis", 2)]);
    let scores = rec.op("Sigmoid", &[values], vec![]);
    // Per-class scores [N, C, k]: the candidate's score in its class, -1 elsewhere (below the
    // NMS score threshold of -0.5, so only real candidates take part).
    let onehot = rec.op(
        "OneHot",
        &[
            &class,
            &rec.const_i64(&[c as i64]),
            &rec.const_f32(&[2], &[0.0, 1.0]),
        ],
        vec![attr_int("axis", -1)],
    );
    let s3 = rec.op("Unsqueeze", &[&scores, &rec.const_i64(&[2])], vec![]);
    let one = rec.const_f32(&[], &[1.0]);
    let masked = bin("Add", &bin("Mul", &s3, &onehot), &bin("Sub", &onehot, &one));
    let masked = rec.op("Transpose", &[&masked], vec![attr_ints("perm", &[0, 2, 1])]);
    let selected = rec.op(
        "NonMaxSuppression",
        &[
            &boxes,
            &masked,
            &rec.const_i64(&[post.max_detections as i64]),
            &rec.const_f32(&[1], &[post.iou_threshold]),
            &rec.const_f32(&[1], &[-0.5]),
        ],
        vec![attr_int("center_point_box", 0)],
    );
    // The kept candidates' scores back in a [N, C, k] grid of -1, then the best kd per image.
    let kept = rec.op("GatherND", &[&masked, &selected], vec![]);
    let minus1 = rec.op(
        "Sub",
        &[&rec.op("Mul", &[&masked, &lo], vec![]), &one],
        vec![],
    );
    let grid = rec.op("ScatterND", &[&minus1, &selected, &kept], vec![]);
    // The best kd of the [N, C, k] grid: class = flat / k, candidate = flat % k.
    let (best_score, det_class, det_cand) = top(&grid, kd, k);
    let best_score = &best_score;
    let det_boxes = rec.op(
        "GatherElements",
        &[&boxes, &by4(&det_cand)],
        vec![attr_int("axis", 1)],
    );
    let valid = rec.op(
        "Greater",
        &[best_score, &rec.const_f32(&[], &[-0.5])],
        vec![],
    );
    let to_i32 = |v: &Value| {
        rec.op(
            "Cast",
            &[v],
            vec![attr_int("to", i64::from(data_type::INT32))],
        )
    };
    let zero = rec.const_f32(&[], &[0.0]);
    let zero_i = rec.initializer("c", &[], data_type::INT32, 0i32.to_le_bytes().to_vec());
    let num = rec.op(
        "ReduceSum",
        &[&to_i32(&valid), &rec.const_i64(&[1])],
        vec![attr_int("keepdims", 1)],
    );
    let scores_out = rec.op("Where", &[&valid, best_score, &zero], vec![]);
    let valid3 = rec.op("Unsqueeze", &[&valid, &rec.const_i64(&[2])], vec![]);
    let boxes_out = rec.op("Where", &[&valid3, &det_boxes, &zero], vec![]);
    let classes_out = rec.op("Where", &[&valid, &to_i32(&det_class), &zero_i], vec![]);
    let n = outs
        .first()
        .map_or(1, |o| o.class.shape.first().copied().unwrap_or(1));
    Ok([
        Value {
            shape: vec![n, 1],
            ..num
        },
        Value {
            shape: vec![n, kd, 4],
            ..boxes_out
        },
        Value {
            shape: vec![n, kd],
            ..scores_out
        },
        Value {
            shape: vec![n, kd],
            ..classes_out
        },
    ])
}

fn value_info(name: &str, batch: &Dimension, rest: &[usize]) -> ValueInfoProto {
    typed_value_info(name, data_type::FLOAT, batch, rest)
}

fn typed_value_info(
    name: &str,
    elem_type: i32,
    batch: &Dimension,
    rest: &[usize],
) -> ValueInfoProto {
    let mut dim = vec![batch.clone()];
    dim.extend(rest.iter().map(|&d| Dimension {
        value: Some(DimensionValue::DimValue(d as i64)),
    }));
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            }),
        }),
        ..Default::default()
    }
}

/// The ONNX model of `store`'s network, serialised, with what it holds.
pub fn model_bytes(store: &WeightStore, opts: &ExportOptions) -> Result<(Vec<u8>, ExportReport)> {
    let config = config_for_weights(store, EfficientDetConfig::d0(), opts.input_size)?;
    let (size, _) = config.image_size;
    let (record_batch, batch_dim, max_batch) = match opts.batch {
        BatchDim::Fixed(0) | BatchDim::Dynamic { max: 0 } => {
            return Err(Error::InvalidArgument(
                "the batch size must be at least 1".into(),
            ));
        }
        BatchDim::Fixed(n) => (n, DimensionValue::DimValue(n as i64), n),
        BatchDim::Dynamic { max } => (1, DimensionValue::DimParam("N".into()), max),
    };
    let batch = Dimension {
        value: Some(batch_dim),
    };
    let rec = OnnxRecorder::default();
    let model = EfficientDet::load(&rec, store, config.clone())?;
    let input = rec.input(record_batch, size);
    let outs = model.forward(&rec, &input)?;
    let mut outputs = Vec::new();
    let post = crate::postprocess::PostprocessConfig {
        num_classes: config.num_classes,
        ..Default::default()
    };
    match opts.postprocess {
        PostprocessGraph::None => {
            for (i, o) in outs.iter().enumerate() {
                let level = config.min_level + i;
                for (kind, v) in [("class", &o.class), ("box", &o.boxes)] {
                    let name = format!("{kind}_{level}");
                    rec.rename(v, &name);
                    outputs.push(value_info(&name, &batch, &v.shape[1..]));
                }
            }
        }
        PostprocessGraph::Onnx => {
            let dets = postprocess_graph(&rec, &outs, &config, &post)?;
            let names = [
                ("num_detections", data_type::INT32),
                ("detection_boxes", data_type::FLOAT),
                ("detection_scores", data_type::FLOAT),
                ("detection_classes", data_type::INT32),
            ];
            for (v, (name, ty)) in dets.iter().zip(names) {
                rec.rename(v, name);
                outputs.push(typed_value_info(name, ty, &batch, &v.shape[1..]));
            }
        }
    }
    let g = rec.g.into_inner().unwrap_or_else(|e| e.into_inner());
    let mut meta = vec![
        (META_IMAGE_SIZE.to_string(), size.to_string()),
        (
            "effdet.num_classes".to_string(),
            config.num_classes.to_string(),
        ),
        ("effdet.max_batch".to_string(), max_batch.to_string()),
        (
            "effdet.input".to_string(),
            "RGB resized (aspect kept) into the top-left of SxS, filled with 124,116,104, then \
             (x - 255 mean) / (255 std) per channel with ImageNet's mean 0.485,0.456,0.406 and \
             std 0.229,0.224,0.225 (effdet's; what effdet::Detector::preprocess produces)"
                .to_string(),
        ),
        (
            "effdet.outputs".to_string(),
            "class_L: [N, A*C, H, W] logits, box_L: [N, A*4, H, W] codes (ty, tx, th, tw), \
             per level L; anchor-major channels (anchor * C + class)"
                .to_string(),
        ),
    ];
    if opts.postprocess == PostprocessGraph::Onnx {
        meta.push((
            "effdet.postprocess".to_string(),
            format!(
                "onnx: top {} logits, decode, clip to the input, sigmoid, per-class NMS at IoU > \
                 {}, the best {} (EfficientNMS_TRT's outputs; boxes x1 y1 x2 y2 in input pixels, \
                 classes 0-based)",
                post.max_detection_points, post.iou_threshold, post.max_detections
            ),
        ));
    }
    if let Some(labels) = store.metadata().get(META_LABELS) {
        meta.push((META_LABELS.to_string(), labels.clone()));
    }
    let report = ExportReport {
        image_size: size,
        num_classes: config.num_classes,
        nodes: g.nodes.len(),
        initializers: g.initializers.len(),
        bytes: 0,
    };
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: OPSET,
        }],
        producer_name: "effdet-rs".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        model_version: 1,
        // The weights' file name, not its path: the same weights export to the same bytes
        // wherever they are (models/ ships an export that a test regenerates).
        doc_string: format!(
            "EfficientDet-D0 ({} classes, input {size}x{size}), exported by effdet-rs from {}",
            config.num_classes,
            store
                .path()
                .file_name()
                .map_or("weights".into(), |f| f.to_string_lossy())
        ),
        graph: Some(GraphProto {
            node: g.nodes,
            name: "efficientdet_d0".into(),
            initializer: g.initializers,
            input: vec![value_info("images", &batch, &[3, size, size])],
            output: outputs,
            ..Default::default()
        }),
        metadata_props: meta
            .into_iter()
            .map(|(key, value)| StringStringEntryProto { key, value })
            .collect(),
        ..Default::default()
    };
    let bytes = model.encode_to_vec();
    Ok((
        bytes.clone(),
        ExportReport {
            bytes: bytes.len(),
            ..report
        },
    ))
}

/// Exports the model in `weights` to `out` (written through a temporary file in the same
/// folder and renamed, so a failure leaves no partial file and an existing `out` intact).
pub fn export(weights: &Path, out: &Path, opts: &ExportOptions) -> Result<ExportReport> {
    let store = WeightStore::open(weights)?;
    let (bytes, report) = model_bytes(&store, opts)?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file_name = out
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("{}: not a file path", out.display())))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, out))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(out, e)
        })?;
    Ok(report)
}

//! What a model's outputs are called: the 1000 ImageNet classes in sorted WNID order (the
//! order torchvision and Caffe use), or the class folders a model was trained on.

/// `(wnid, names)` of class index `i` at position `i`; embedded from `data/imagenet1k_classes.tsv`.
pub fn imagenet_classes() -> Vec<(&'static str, &'static str)> {
    include_str!("../data/imagenet1k_classes.tsv").lines().filter_map(|line| line.split_once('\t')).collect()
}

/// Indices of the `k` largest values (all of them if fewer), largest first; ties: lower index first.
/// (Here, not in `eval`, so that `model` can name its predictions without importing `eval`.)
pub fn top_k(p: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// The classes of a model's outputs, in output order: each with the ID a data set labels it by
/// (an ImageNet WNID, or a training folder's name) and the name people read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classes(Vec<(String, String)>);

impl Classes {
    /// The 1000 ImageNet classes.
    pub fn imagenet() -> Self {
        Classes(imagenet_classes().into_iter().map(|(id, name)| (id.to_string(), name.to_string())).collect())
    }

    /// The class folders a model was trained on (`train` records them): the folder's name is
    /// both the ID and the name.
    pub fn folders(names: &[String]) -> Self {
        Classes(names.iter().map(|n| (n.clone(), n.clone())).collect())
    }

    /// What a model with `n` outputs and no recorded class names is taken to predict:
    /// ImageNet's classes for 1000 outputs, else `class 0` ... `class n-1`.
    pub fn unnamed(n: usize) -> Self {
        if n == 1000 {
            return Self::imagenet();
        }
        Classes((0..n).map(|i| (i.to_string(), format!("class {i}"))).collect())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The ID of class `i` (what a data set's labels or folders call it).
    pub fn id(&self, i: usize) -> &str {
        &self.0[i].0
    }

    /// The readable name of class `i`.
    pub fn name(&self, i: usize) -> &str {
        &self.0[i].1
    }

    pub fn ids(&self) -> Vec<&str> {
        self.0.iter().map(|(id, _)| id.as_str()).collect()
    }
}

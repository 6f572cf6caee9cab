//! The 1000 ImageNet classes in sorted WNID order (the order torchvision and Caffe use).

/// `(wnid, names)` of class index `i` at position `i`; embedded from `data/imagenet1k_classes.tsv`.
pub fn imagenet_classes() -> Vec<(&'static str, &'static str)> {
    include_str!("../data/imagenet1k_classes.tsv").lines().filter_map(|line| line.split_once('\t')).collect()
}

//! Entry points shared by the fuzz targets in `fuzz/` and the corpus replay
//! test (`tests/fuzz_corpus.rs`), so both run exactly the same checks.
//! Each takes arbitrary bytes and panics only when a property that must
//! hold for every input is broken. Not part of the crate's API.

use std::collections::BTreeMap;

use crate::model::{MeshConfig, MeshIndex};
use crate::source::manifests::parse_manifest;

pub use crate::xds::fuzzing::delta_request;

/// The standalone folder's YAML → objects → model. Properties: every object
/// returned has a key (the folder indexes by it), and the model built by
/// applying the objects one by one serves the same resources as one built
/// in a single relist of the final set (the last document of a key wins).
/// Returns whether the text parsed.
pub fn manifest(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(parsed) = parse_manifest(text) else {
        return false;
    };
    let mut incremental = MeshIndex::new(MeshConfig::default());
    let mut last = BTreeMap::new();
    for object in parsed.objects {
        let Some(key) = object.key() else {
            panic!("parse_manifest returned an object without a key: {object:?}");
        };
        incremental.apply(object.clone());
        last.insert(key, object);
    }
    let mut fresh = MeshIndex::new(MeshConfig::default());
    fresh.replace_all(last.into_values().collect());
    let served = |index: &MeshIndex| {
        (
            index
                .addresses()
                .map(|(k, v)| (k.to_owned(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
            index
                .authorizations()
                .map(|(k, v)| (k.to_owned(), v.clone()))
                .collect::<BTreeMap<_, _>>(),
        )
    };
    assert_eq!(
        served(&incremental),
        served(&fresh),
        "applied one by one vs. relisted"
    );
    assert_eq!(incremental.statuses(), fresh.statuses());
    true
}

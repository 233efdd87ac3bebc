//! The byte-stream helpers the other tests rely on to prove byte-exact
//! delivery: generation must not depend on how the stream is cut, and a
//! mismatch must name its offset.

mod common;

use common::{Pattern, Verifier};

#[test]
fn pattern_is_the_same_however_it_is_cut() {
    let cuts = [1usize, 7, 8, 9, 65_535, 65_537, 3, 100_000];
    let whole = Pattern::bytes(7, cuts.iter().sum());
    let mut p = Pattern::new(7);
    let mut pieces = Vec::new();
    for n in cuts {
        let mut b = vec![0; n];
        p.fill(&mut b);
        pieces.extend_from_slice(&b);
    }
    // Not assert_eq: a failure would print hundreds of kilobytes.
    assert!(pieces == whole, "chunked output differs from the whole");
    assert_ne!(Pattern::bytes(1, 64), Pattern::bytes(2, 64));
}

#[test]
fn verifier_names_the_first_wrong_byte() {
    let mut data = Pattern::bytes(3, 100_000);
    data[70_001] ^= 0x40;
    let mut v = Verifier::new(3);
    v.check(&data[..50_000]).expect("first half is intact");
    let err = v
        .check(&data[50_000..])
        .expect_err("second half is corrupt");
    assert!(err.contains("byte 70001"), "{err}");
}

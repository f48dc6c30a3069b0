use super::*;
use proptest::prelude::*;

const SHARDS: u32 = 1024;

fn names(n: usize, salt: u64) -> Vec<NodeName> {
    (0..n)
        .map(|i| NodeName::new(&format!("node-{salt:x}-{i}")).unwrap())
        .collect()
}

fn counts(p: &Placement) -> Vec<usize> {
    p.nodes().iter().map(|m| p.shards_of(m).len()).collect()
}

#[test]
fn the_hash_is_fnv1a_as_published() {
    // The published FNV-1a 64-bit test vectors: a build that changed the hash would move
    // every shard of a mixed-version cluster.
    assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
}

#[test]
fn names_outside_the_alphabet_are_refused() {
    for bad in ["", "a b", "ñode", "x/y", &"n".repeat(65)] {
        assert!(
            matches!(NodeName::new(bad), Err(crate::Error::InvalidNodeName(ref s)) if s == bad),
            "{bad:?}"
        );
    }
    assert_eq!(
        NodeName::new("node-1.eu_west").unwrap().as_str(),
        "node-1.eu_west"
    );
}

#[test]
fn an_empty_member_list_is_an_error() {
    assert!(matches!(
        Placement::compute(SHARDS, &[]),
        Err(crate::Error::NoNodes)
    ));
}

#[test]
fn one_node_owns_every_shard() {
    let one = names(1, 7);
    let p = Placement::compute(SHARDS, &one).unwrap();
    assert_eq!(p.shards_of(&one[0]).len(), SHARDS as usize);
    assert_eq!(p.owner(KeyRange(SHARDS)), None);
    assert!(p.shards_of(&NodeName::new("stranger").unwrap()).is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_node_computes_the_same_placement_whatever_the_order(
        n in 1usize..12, salt in any::<u64>(), rot in 0usize..12,
    ) {
        let mut list = names(n, salt);
        let a = Placement::compute(SHARDS, &list).unwrap();
        list.rotate_left(rot % n);
        list.reverse();
        list.push(list[0].clone());
        prop_assert_eq!(a, Placement::compute(SHARDS, &list).unwrap());
    }

    #[test]
    fn shards_spread_within_ten_percent_at_three_to_ten_nodes(n in 3usize..=10, salt in any::<u64>()) {
        let p = Placement::compute(SHARDS, &names(n, salt)).unwrap();
        let even = f64::from(SHARDS) / n as f64;
        let c = counts(&p);
        prop_assert_eq!(c.iter().sum::<usize>(), SHARDS as usize);
        for &k in &c {
            prop_assert!((k as f64 - even).abs() <= 0.10 * even, "{:?} against {}", c, even);
        }
    }

    #[test]
    fn a_join_moves_little_more_than_the_new_node_takes(n in 1usize..=10, salt in any::<u64>()) {
        let before = names(n, salt);
        let mut after = before.clone();
        after.push(NodeName::new(&format!("joiner-{salt:x}")).unwrap());
        let (a, b) = (
            Placement::compute(SHARDS, &before).unwrap(),
            Placement::compute(SHARDS, &after).unwrap(),
        );
        let moved = a.moves(&b).len();
        // The minimum: the new node's share, taken from the others.
        let minimum = b.shards_of(after.last().unwrap()).len();
        prop_assert!(minimum > 0);
        prop_assert!(
            moved as f64 <= minimum as f64 + 0.04 * f64::from(SHARDS),
            "{} moved, minimum {}", moved, minimum
        );
    }

    #[test]
    fn a_leave_moves_little_more_than_the_leaver_held(n in 2usize..=11, salt in any::<u64>(), which in 0usize..11) {
        let before = names(n, salt);
        let gone = before[which % n].clone();
        let after: Vec<_> = before.iter().filter(|m| **m != gone).cloned().collect();
        let (a, b) = (
            Placement::compute(SHARDS, &before).unwrap(),
            Placement::compute(SHARDS, &after).unwrap(),
        );
        let moves = a.moves(&b);
        let minimum = a.shards_of(&gone).len();
        // Every shard of the leaver moves, to a node that stays.
        prop_assert_eq!(moves.iter().filter(|m| *m.from == gone).count(), minimum);
        prop_assert!(moves.iter().all(|m| *m.to != gone));
        prop_assert!(
            moves.len() as f64 <= minimum as f64 + 0.04 * f64::from(SHARDS),
            "{} moved, minimum {}", moves.len(), minimum
        );
    }
}

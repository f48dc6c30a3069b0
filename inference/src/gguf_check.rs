//! A walk over a GGUF file's header that checks every count, length and dimension against
//! the bytes present before candle's reader allocates anything from them: a damaged or
//! hostile file is an error naming what is wrong, never a huge allocation, a division by
//! zero or a panic.

/// Longest string in a header (keys, values, tensor names).
const MAX_STRING: u64 = 16 * 1024 * 1024;
/// Deepest nesting of arrays.
const MAX_DEPTH: u32 = 3;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Most elements of one tensor (2^40: far beyond any model that fits a machine).
const MAX_ELEMENTS: u64 = 1 << 40;

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            return Err(format!(
                "{what} at offset {} needs {n} bytes but the file has {left} left",
                self.at
            ));
        }
        let n = n as usize;
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn string(&mut self, what: &str) -> Result<&'a str, String> {
        let at = self.at;
        let len = self.u64(what)?;
        if len > MAX_STRING {
            return Err(format!("{what} at offset {at} claims {len} bytes"));
        }
        let b = self.take(len, what)?;
        std::str::from_utf8(b).map_err(|_| format!("{what} at offset {at} is not UTF-8"))
    }

    fn left(&self) -> u64 {
        (self.bytes.len() - self.at) as u64
    }
}

/// Size of a scalar value type, `None` for strings and arrays.
fn scalar_size(t: u32) -> Option<u64> {
    match t {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// A metadata value of type `t` as far as its shape goes; the `general.alignment` value is
/// returned when `key` is it.
fn value(r: &mut Reader<'_>, key: &str, t: u32, depth: u32) -> Result<Option<u64>, String> {
    match t {
        8 => {
            r.string(&format!("the value of `{key}`"))?;
            Ok(None)
        }
        9 => {
            if depth >= MAX_DEPTH {
                return Err(format!("`{key}`: arrays nested deeper than {MAX_DEPTH}"));
            }
            let elem = r.u32(&format!("the element type of `{key}`"))?;
            let count = r.u64(&format!("the length of `{key}`"))?;
            let min = match (elem, scalar_size(elem)) {
                (_, Some(s)) => s,
                (8 | 9, None) => 8,
                _ => return Err(format!("`{key}`: unknown element type {elem}")),
            };
            if count.checked_mul(min).is_none_or(|n| n > r.left()) {
                return Err(format!(
                    "`{key}` claims {count} elements but the file has {} bytes left",
                    r.left()
                ));
            }
            match scalar_size(elem) {
                Some(s) => {
                    r.take(count * s, &format!("the elements of `{key}`"))?;
                }
                None => {
                    for _ in 0..count {
                        value(r, key, elem, depth + 1)?;
                    }
                }
            }
            Ok(None)
        }
        _ => {
            let Some(size) = scalar_size(t) else {
                return Err(format!("`{key}`: unknown value type {t}"));
            };
            let b = r.take(size, &format!("the value of `{key}`"))?;
            if key == "general.alignment" {
                if t != 4 {
                    return Err("`general.alignment` must be a u32".into());
                }
                return Ok(Some(u64::from(u32::from_le_bytes([
                    b[0], b[1], b[2], b[3],
                ]))));
            }
            Ok(None)
        }
    }
}

/// The ggml tensor types candle reads.
fn known_dtype(t: u32) -> bool {
    matches!(t, 0..=3 | 6..=15 | 30)
}

/// Checks the header of the GGUF file in `bytes`.
pub(crate) fn check_header(bytes: &[u8]) -> Result<(), String> {
    let mut r = Reader { bytes, at: 0 };
    if r.take(4, "the magic number")? != b"GGUF" {
        return Err("not a GGUF file (the magic number is not `GGUF`)".into());
    }
    let version = r.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!(
            "GGUF version {version} is not supported (2 and 3 are)"
        ));
    }
    let tensors = r.u64("the tensor count")?;
    let kvs = r.u64("the metadata count")?;
    // Each metadata entry takes at least 8 (key length) + 4 (type) + 1 bytes; each tensor
    // info at least 8 + 4 + 4 + 8.
    if kvs.checked_mul(13).is_none_or(|n| n > r.left()) {
        return Err(format!(
            "the header claims {kvs} metadata entries, more than the file holds"
        ));
    }
    if tensors.checked_mul(24).is_none_or(|n| n > r.left()) {
        return Err(format!(
            "the header claims {tensors} tensors, more than the file holds"
        ));
    }
    let mut alignment = 32u64;
    for _ in 0..kvs {
        let key = r.string("a metadata key")?.to_string();
        let t = r.u32(&format!("the type of `{key}`"))?;
        if let Some(a) = value(&mut r, &key, t, 0)? {
            if a == 0 || !a.is_power_of_two() {
                return Err(format!(
                    "`general.alignment` is {a}: it must be a power of two"
                ));
            }
            alignment = a;
        }
    }
    let mut names = std::collections::HashSet::new();
    for _ in 0..tensors {
        let name = r.string("a tensor name")?.to_string();
        let n_dims = r.u32(&format!("the dimension count of `{name}`"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(format!(
                "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS})"
            ));
        }
        let mut elements = 1u64;
        for _ in 0..n_dims {
            let d = r.u64(&format!("a dimension of `{name}`"))?;
            if d == 0 {
                return Err(format!("tensor `{name}` has a zero dimension"));
            }
            elements = elements
                .checked_mul(d)
                .filter(|&n| n <= MAX_ELEMENTS)
                .ok_or_else(|| format!("tensor `{name}` has more than 2^40 elements"))?;
        }
        let dtype = r.u32(&format!("the type of `{name}`"))?;
        if !known_dtype(dtype) {
            return Err(format!("tensor `{name}` has unknown ggml type {dtype}"));
        }
        let offset = r.u64(&format!("the offset of `{name}`"))?;
        if !offset.is_multiple_of(alignment) {
            return Err(format!(
                "tensor `{name}` starts at {offset}, not a multiple of the alignment {alignment}"
            ));
        }
        if !names.insert(name.clone()) {
            return Err(format!("tensor `{name}` is listed twice"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// A small valid header: one u32 metadata value, one f32 tensor of `dims`.
    fn header(alignment: Option<u32>, dims: &[u64], offset: u64) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&(1u64 + u64::from(alignment.is_some())).to_le_bytes());
        string(&mut b, "llama.block_count");
        b.extend_from_slice(&4u32.to_le_bytes());
        b.extend_from_slice(&1u32.to_le_bytes());
        if let Some(a) = alignment {
            string(&mut b, "general.alignment");
            b.extend_from_slice(&4u32.to_le_bytes());
            b.extend_from_slice(&a.to_le_bytes());
        }
        string(&mut b, "token_embd.weight");
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b
    }

    #[test]
    fn bad_header_values_are_errors_naming_them() {
        assert!(check_header(&header(None, &[4, 2], 0)).is_ok());
        let e = check_header(&header(Some(0), &[4, 2], 0)).unwrap_err();
        assert!(e.contains("general.alignment"), "{e}");
        let e = check_header(&header(None, &[4, 0], 0)).unwrap_err();
        assert!(e.contains("zero dimension"), "{e}");
        let e = check_header(&header(None, &[1 << 32, 1 << 32], 0)).unwrap_err();
        assert!(e.contains("2^40"), "{e}");
        let e = check_header(&header(None, &[4, 2], 3)).unwrap_err();
        assert!(e.contains("alignment"), "{e}");
        let mut huge = header(None, &[4], 0);
        huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(
            check_header(&huge)
                .unwrap_err()
                .contains("metadata entries")
        );
        assert!(check_header(b"GGML\x03\0\0\0").is_err());
    }

    #[test]
    fn the_real_model_header_passes() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
        let Ok(bytes) = std::fs::read(&path) else {
            panic!("{} is missing: run scripts/fetch-models.sh", path.display());
        };
        check_header(&bytes).unwrap();
    }

    proptest! {
        #[test]
        fn any_bytes_give_an_answer_not_a_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = check_header(&bytes);
        }

        #[test]
        fn damaged_valid_headers_give_an_answer_not_a_panic(
            flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8),
            cut in 0usize..200,
        ) {
            let mut b = header(Some(64), &[4, 2], 64);
            for (at, v) in flips {
                if let Some(x) = b.get_mut(at) {
                    *x = v;
                }
            }
            b.truncate(cut.max(4));
            let _ = check_header(&b);
        }
    }
}

//! Leftmost-longest literal matching of special / added token strings.

/// Literals bucketed by first byte, each bucket longest first.
pub struct LiteralMatcher {
    buckets: Vec<Vec<(Box<[u8]>, u32)>>,
}

impl LiteralMatcher {
    pub fn new(literals: impl IntoIterator<Item = (Vec<u8>, u32)>) -> Self {
        let mut buckets: Vec<Vec<(Box<[u8]>, u32)>> = vec![Vec::new(); 256];
        for (lit, id) in literals {
            if let Some(&first) = lit.first() {
                buckets[usize::from(first)].push((lit.into_boxed_slice(), id));
            }
        }
        for b in &mut buckets {
            // Longest first; equal lengths keep insertion (id) order.
            b.sort_by_key(|c| std::cmp::Reverse(c.0.len()));
        }
        Self { buckets }
    }

    /// Non-overlapping matches `(start, end, id)`, scanning left to right and taking the
    /// longest literal at the leftmost position.
    pub fn find_iter<'a>(
        &'a self,
        text: &'a [u8],
    ) -> impl Iterator<Item = (usize, usize, u32)> + 'a {
        let mut pos = 0;
        std::iter::from_fn(move || {
            while pos < text.len() {
                let bucket = &self.buckets[usize::from(text[pos])];
                let rest = &text[pos..];
                if let Some((lit, id)) = bucket.iter().find(|(lit, _)| rest.starts_with(lit)) {
                    let start = pos;
                    pos += lit.len();
                    return Some((start, pos, *id));
                }
                pos += 1;
            }
            None
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leftmost_longest() {
        let m = LiteralMatcher::new([
            (b"<a>".to_vec(), 1),
            (b"<a>b".to_vec(), 2),
            (b"b<".to_vec(), 3),
        ]);
        let got: Vec<_> = m.find_iter(b"x<a>b<a>").collect();
        assert_eq!(got, vec![(1, 5, 2), (5, 8, 1)]);
        assert_eq!(m.find_iter(b"").count(), 0);
        assert_eq!(m.find_iter(b"<a").count(), 0);
    }
}

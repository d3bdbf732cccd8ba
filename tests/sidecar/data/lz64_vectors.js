// Vectors for tests/sidecar/test_lzstring.py: strings and LZString.compressToBase64 (lz-string 1.5.0).
const LZ = require('lz-string');
const inputs = [
  'a', 'hello', 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',
  'ababababababababababababababab', 'é ñ ü ß — “quotes”', '😀 emoji 🚀 and 𝄞', '日本語のテキスト',
  JSON.stringify([{event: '$pageview', distinct_id: 'u1', properties: {$current_url: 'https://example.com/a?b=c', token: 'phc_x'}, timestamp: '2026-11-27T10:00:00.000Z', uuid: '0190a-1'}]),
  JSON.stringify({batch: Array.from({length: 50}, (_, i) => ({event: 'clicked ' + (i % 7), distinct_id: 'user-' + (i % 13), uuid: 'id-' + i}))}),
  'x'.repeat(5000) + 'y'.repeat(3000),
  Array.from({length: 2000}, (_, i) => String.fromCharCode(32 + (i * 7919) % 20000)).join(''),
];
console.log(JSON.stringify(inputs.map(text => ({text, lz64: LZ.compressToBase64(text)})), null, 1));

package redisbroker

// keySlot is the Redis Cluster slot of a session's keys, whose hash tag is
// the session id: CRC16 (XMODEM) of the tag, modulo 16384.
func keySlot(tag string) uint16 {
	var crc uint16
	for i := 0; i < len(tag); i++ {
		crc ^= uint16(tag[i]) << 8
		for range 8 {
			if crc&0x8000 != 0 {
				crc = crc<<1 ^ 0x1021
			} else {
				crc <<= 1
			}
		}
	}
	return crc % 16384
}

module github.com/meshvpn/libmeshvpn/bindings/go

go 1.24
